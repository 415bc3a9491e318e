"""The custom-code files of a diffmoe transformers export (copied next to config.json by
:func:`diffmoe.hf.export.export_custom`). They import only torch and transformers: never import
diffmoe from them."""
