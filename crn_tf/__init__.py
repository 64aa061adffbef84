"""crn_tf: Cascaded Refinement Networks (Chen & Koltun, ICCV 2017) in TensorFlow 2 / Keras 3.

From Python, on any Keras backend (crn_tf/api.py):

    import crn_tf
    crn = crn_tf.LayoutToPhoto.from_model_dir("runs/toy")
    photos = crn.predict("layout.png")  # uint8 [1, H, W, 3]
"""

__version__ = "0.1.0"

_API = ("LayoutToPhoto", "load_model")


def __getattr__(name):
    # Deferred: `import crn_tf` (and its config tools) needs no Keras; the API imports it when used.
    if name in _API:
        from crn_tf import api

        return getattr(api, name)
    raise AttributeError(f"module 'crn_tf' has no attribute {name!r}")
