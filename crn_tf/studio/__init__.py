"""crn-studio: a browser painting page over a TF-Serving-compatible REST endpoint for an exported CRN.

`server.create_app(saved_model=...)` builds the ASGI app; `crn-studio` (server.run) serves it. The REST
conventions are in `rest`, the SavedModel / TF Serving backends in `backends`, the page in static/.
"""
