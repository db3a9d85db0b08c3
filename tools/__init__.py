"""Command-line tools beside the paper's pipeline: caption an image folder with a VLM (App. D), turn image folders
or IDX files into the captions.jsonl layout, and the embedded sets' own classifiers (domain FID, class accuracy)."""
