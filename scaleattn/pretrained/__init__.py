"""ImageNet weights: foreign files in, our converted file out, and into a run.

Split by job:

* `readers` (with `torch_files` and `keras_files`): torchvision ``.pth`` /
  ``.safetensors`` and Keras ``.h5`` / ``.keras`` files -> ``{name: np.ndarray}``,
  without PyTorch or TensorFlow and without executing anything in the file.
* `maps` and `surgery`: which source array each of our arrays comes from, and how it
  is reshaped (layouts, VGG16's fc6/fc7 -> LargeFOV, input normalisation folding).
* `conversion`: the two together, ``{name: array}`` -> our tree (`convert`), and
  ``python -m scaleattn.convert``'s file-to-file step (`convert_file`).
* `our_format`: the converted msgpack file (`save_pretrained`, `read_pretrained`) and
  `WeightsError`, the error every part raises.
* `merge`: a converted file into a fresh train state (`load_pretrained`, for
  ``config.model.init_from``).
"""

from scaleattn.pretrained.conversion import (ARCHS, KERAS_ARCHS, SOURCES, convert,
                                             convert_file, target_shapes)
from scaleattn.pretrained.maps import keras_name, torchvision_name, vgg_feature_indices
from scaleattn.pretrained.merge import (check_meta, load_pretrained, merge_pretrained,
                                        summarise)
from scaleattn.pretrained.our_format import (FORMAT, WeightsError, read_pretrained,
                                             save_pretrained)
from scaleattn.pretrained.readers import (read_keras, read_safetensors, read_torch,
                                          read_weights, sniff)
from scaleattn.pretrained.surgery import (INPUT_CONVENTIONS, fc_as_conv_from_keras,
                                          fc_as_conv_from_torch, fold_input_convention)
from scaleattn.pretrained.torch_files import UnsafePickleError

__all__ = [
    "ARCHS", "FORMAT", "INPUT_CONVENTIONS", "KERAS_ARCHS", "SOURCES", "UnsafePickleError",
    "WeightsError", "check_meta", "convert", "convert_file", "fc_as_conv_from_keras",
    "fc_as_conv_from_torch", "fold_input_convention", "keras_name", "load_pretrained",
    "merge_pretrained", "read_keras", "read_pretrained", "read_safetensors", "read_torch",
    "read_weights", "save_pretrained", "sniff", "summarise", "target_shapes",
    "torchvision_name", "vgg_feature_indices",
]
