"""CascadedRefinementNetwork: the generator g(L; theta) built from a CRNConfig.

Backend-agnostic (`keras.ops` and `crn_tf.ops`; no TensorFlow import): the same model builds, runs
and differentiates on TensorFlow and JAX. Reading and writing model_dirs is `crn_tf/model_dir.py`.
"""

from __future__ import annotations

import keras
from keras import ops

from crn_tf.config import CRNConfig
from crn_tf.layers import OutputHead, RefinementModule
from crn_tf.ops import area_downsample, check_size_multiple, recompute
from crn_tf.serving_contract import fits_size_multiple


@keras.saving.register_keras_serializable(package="crn_tf")
class CascadedRefinementNetwork(keras.Model):
    """A cascade of refinement modules from the base resolution up to the input's (paper Sec. 3.2).

    Fully convolutional: one instance runs on any layout whose height and width are multiples of
    `config.size_multiple` (the coarsest module then works at H / 2^(m-1) x W / 2^(m-1)).

    Call: one-hot layout float [N, H, W, num_classes + 1] (void last) -> RGB float [N, H, W, 3k] in
    about [0, 255]. Modules are attributes named by native scale (`module_4x8`, ...), so checkpoint
    keys and layer names stay the same when a cascade grows by a module.
    """

    def __init__(self, config: CRNConfig | dict, **kwargs):
        if isinstance(config, dict):
            config = CRNConfig.from_dict(config)
        kwargs.setdefault("name", "crn")
        super().__init__(**kwargs)
        self.crn_config = config
        self.module_names = config.module_names  # tuple of str: not tracked as a layer container
        for name, width in zip(config.module_names, config.widths):
            module = RefinementModule(
                width, upsampling=config.upsampling, normalization=config.normalization, name=name
            )
            setattr(self, name, module)
        # float32 head: under a mixed-precision policy the image and the loss stay in float32.
        self.head = OutputHead(config.num_outputs, name="head", dtype="float32")
        # Recompute each module's activations in the backward pass instead of keeping them (the
        # trainer's --remat); not part of the config: the function and its parameters are the same.
        self.remat = False
        self.build((None, None, None, config.input_channels))

    @property
    def refinement_modules(self) -> list[RefinementModule]:
        """The modules, coarsest first."""
        return [getattr(self, name) for name in self.module_names]

    def build(self, input_shape):
        if input_shape[-1] is not None and input_shape[-1] != self.crn_config.input_channels:
            raise ValueError(self._channel_message(input_shape[-1]))
        layout_shape = (None, None, None, self.crn_config.input_channels)
        features_shape = None
        for module in self.refinement_modules:
            module.build(layout_shape, features_shape)
            features_shape = (None, None, None, module.width)
        self.head.build(features_shape)
        self.built = True

    def _channel_message(self, channels) -> str:
        c = self.crn_config
        return (
            f"layout has {channels} channels; CRN {c.name!r} expects {c.input_channels} "
            f"({c.num_classes} classes of label space {c.label_space!r} + 1 void channel)"
        )

    def _check_layout(self, layout):
        """Static checks where the shape is known; on TensorFlow a run-time InvalidArgument where it is not."""
        c = self.crn_config
        m = c.size_multiple
        try:
            shape = tuple(layout.shape)
        except ValueError:  # a TensorFlow graph tensor of unknown rank: nothing to check statically
            return layout
        if len(shape) != 4:
            raise ValueError(f"layout must be a batch of one-hot layouts [N, H, W, C], got shape {shape}")
        if shape[-1] is not None and shape[-1] != c.input_channels:
            raise ValueError(self._channel_message(shape[-1]))
        message = (
            f"CRN {c.name!r} has {c.num_modules} modules, so layout height and width must be positive "
            f"multiples of {m} (= 2^{c.num_modules - 1}); native size {c.native_size[0]}x{c.native_size[1]}"
        )
        h, w = shape[1], shape[2]
        if h is not None and w is not None:
            if not fits_size_multiple(h, w, m):
                raise ValueError(f"{message}; got {h}x{w}")
            return layout
        return check_size_multiple(layout, m, message)

    def call(self, layout, training=None):
        layout = self._check_layout(layout)
        # The layout at every module's resolution, finest first, then reversed (coarsest first).
        pyramid = [layout]
        for _ in range(self.crn_config.num_modules - 1):
            pyramid.append(area_downsample(pyramid[-1]))
        features = None
        last = self.crn_config.num_modules - 1
        for i, (module, layout_i) in enumerate(zip(self.refinement_modules, reversed(pyramid))):
            # With remat, the backward pass keeps only each module's input and output and recomputes
            # the rest (crn_tf.ops.recompute differentiates the module's variables read inside); all
            # modules but the last, as in gradient checkpointing (Chen et al. 2016, PyTorch's
            # checkpoint_sequential): the last one's backward pass comes first, so recomputing it
            # would rebuild the same activations right away and save only while VGG-19's backward
            # runs, for the time of its forward pass (59% of the generator's at 256x512).
            if self.remat and i < last:
                if features is None:
                    features = recompute(lambda x, m=module: m(x, training=training))(layout_i)
                else:
                    run = recompute(lambda x, f, m=module: m(x, f, training=training))
                    features = run(layout_i, features)
            else:
                features = module(layout_i, features, training=training)
        return self.head(features)

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable, "config": self.crn_config.to_dict()}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        return cls(config.pop("config"), **config)


def build_model(config: CRNConfig) -> CascadedRefinementNetwork:
    """The generator for `config`, built (weights created) and ready to call."""
    return CascadedRefinementNetwork(config)


def split_outputs(images, num_outputs: int):
    """[N, H, W, 3k] -> [N, k, H, W, 3]: image u is channels 3u..3u+2."""
    shape = ops.shape(images)
    images = ops.reshape(images, (shape[0], shape[1], shape[2], num_outputs, 3))
    return ops.transpose(images, (0, 3, 1, 2, 4))
