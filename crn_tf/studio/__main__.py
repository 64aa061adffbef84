"""`python -m crn_tf.studio --saved_model=exports/crn`: the same as `crn-studio`."""

from crn_tf.studio.server import run

run()
