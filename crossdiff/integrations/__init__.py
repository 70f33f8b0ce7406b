"""How crossdiff meets TransformerLens and SAELens: which TransformerLens is installed (lens), and
the import hook that registers the crosscoder with SAELens once both are imported
(sae_lens_hook). Light to import: neither module imports torch, TransformerLens or SAELens."""
