"""Operations: serving the tracking store to a browser (`sr-pipeline ui`) and the cluster kit.

Nothing heavy is imported here: the CLI imports this package at start-up.
"""
