"""`python -m crn_tf.studio --saved_model=exports/crn`: the same as `crn-studio` (see crn_tf.studio.server)."""

from absl import app, flags

from crn_tf.studio import server

server.define_flags()
flags.adopt_module_key_flags(server)  # --help lists the studio's flags
app.run(server.main)
