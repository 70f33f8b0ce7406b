"""Plumbing every stage uses and no stage owns: errors and atomic writes (common), fingerprints,
checksums (integrity), folder locks, lazy exports, torch.distributed helpers, checks of what a
caller passes to the public API, the stage contract's base (stage_config), the stage-folder
marker a stage subcommand leaves for `crossdiff run`, and the presets every stage's `--preset`
reads. Nothing here imports a stage package or crossdiff.run."""
