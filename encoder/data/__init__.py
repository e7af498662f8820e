"""Training data: built-in synthetic scenes, webdataset shards, image folders; transforms; the resumable loader."""
