"""crn_tf: Cascaded Refinement Networks (Chen & Koltun, ICCV 2017) in TensorFlow 2 / Keras 3."""

import pathlib

from setuptools import find_packages, setup

setup(
    name="crn_tf",
    version="0.1.0",
    description="Cascaded Refinement Networks: semantic layout in, photograph out (TensorFlow 2 / Keras 3)",
    long_description=pathlib.Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["crn_tf", "crn_tf.*", "data_tools", "data_tools.*", "export", "export.*"]),
    include_package_data=True,
    package_data={
        "crn_tf.studio": ["static/*.html", "static/*.js", "static/*.css", "static/samples/*.png"],
        # The authors' committed checkpoint index files (crn-import-original --download), MIT.
        "crn_tf": ["original_index/README.md", "original_index/*/model.ckpt.index"]
        # The weights `make demo` starts from (benchmarks/train_demo_weights.py), float16, ~1.7 MB each.
        + ["demo_weights/README.md", "demo_weights/*.npz"],
    },
    # The range we test (TF 2.21 / Keras 3.15). Depend on `tensorflow`, not `tensorflow-cpu`:
    # tensorflow-serving-api pulls in `tensorflow` and two TF wheels must not coexist.
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.15,<3.16",
        "numpy>=1.26",
        "pillow>=10",
        "absl-py>=2",
        "tensorboard>=2.21,<2.22",  # tf.summary needs it; TF 2.21 no longer installs it
        "tensorflow-serving-api>=2.21,<2.22",  # PredictionLog protos for the warmup requests
    ],
    extras_require={
        "nyu": ["h5py>=3"],
        "studio": ["starlette>=1.0,<2", "uvicorn>=0.30,<1"],
        # tf2onnx pinned to 1.17.x: export/onnx_export.py uses two of its internal helpers.
        "onnx": ["tf2onnx>=1.17,<1.18", "onnx>=1.23,<1.24", "onnxruntime>=1.32,<1.33"],
        # KERAS_BACKEND=jax: the model, VGG-19, the losses and crn_tf.LayoutToPhoto (tested on CPU; on
        # GPUs install jax[cuda12]). TensorFlow stays installed for the tools and the input pipeline.
        "jax": ["jax>=0.10,<0.11"],
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.6,<4",  # make test runs the suite on 2 processes (TF's small ops use ~1 core each)
            "ruff>=0.6",
            "h5py>=3",
            "starlette>=1.0,<2",
            "uvicorn>=0.30,<1",
            "selenium>=4.20,<5",
            "tf2onnx>=1.17,<1.18",
            "onnx>=1.23,<1.24",
            "onnxruntime>=1.32,<1.33",
            "scipy>=1.11,<2",  # tests/test_metrics.py: FID against scipy.linalg.sqrtm
            "jax>=0.10,<0.11",  # tests/test_backends.py: the same CRN on the JAX backend (CPU wheel)
        ],
    },
    entry_points={
        "console_scripts": [
            "crn-convert=data_tools.convert:run",
            "crn-train=crn_tf.train:run",
            "crn-import-original=crn_tf.import_original_cli:run",
            "crn-eval=crn_tf.evaluate:run",
            "crn-segmenter=crn_tf.segmenter:main",
            "crn-export=export.export_saved_model:run",
            "crn-synthesize=crn_tf.synthesize:run",
            "crn-studio=crn_tf.studio.server:run",
        ]
    },
)
