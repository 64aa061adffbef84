"""Export of CRN generators for serving: versioned, verified SavedModels for TF Serving (`crn-export`)."""
