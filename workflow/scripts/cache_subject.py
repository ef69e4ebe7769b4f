from pathlib import Path

from neuromoe.smk import run


def main(s):
    from neuromoe.cache import cache_subject, subject_paths

    cfg, sub = s.params.cfg, s.wildcards.subject
    files = subject_paths(Path(s.output.record).parent.parent, sub)
    maps = {m: s.params.maps[m] if s.params.present[m] else None for m in s.params.maps}
    cache_subject(maps, {m: files[m] for m in maps}, cfg["cache"]["grid"], cfg["cache"]["dtype"], sub,
                  json_path=s.output.record, patch=cfg["model"]["patch_size"])


run(snakemake, main)
