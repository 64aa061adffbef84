"""Dataset -> TFRecord converters behind `crn-convert` (see data_tools.convert).

Each converter module lists a dataset's pairs as a `common.PairSource`; `common.convert` writes
the shards and the manifest that `crn_tf.data.make_dataset` reads.
"""
