"""`vlm-depth demo`: the application that runs every command of the package end to end on the embedded default."""
