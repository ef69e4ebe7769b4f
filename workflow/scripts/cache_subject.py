from pathlib import Path

from neuromoe.smk import run, unit


def main(s):
    from neuromoe.cache.store import MODALITIES, cache_subject, subject_paths

    cfg = s.params.cfg
    folder = Path(s.output[0])
    files = subject_paths(folder.parent, unit(s))
    # inputs are named <modality>_<channel index>; a modality the subject lacks has none (recorded absent)
    maps = {m: [str(s.input[k]) for k in sorted(s.input.keys()) if k.startswith(f"{m}_")] or None for m in MODALITIES}
    cache_subject(maps, {m: files[m] for m in MODALITIES}, cfg["cache"]["grid"], cfg["cache"]["dtype"],
                  s.wildcards.subject, json_path=files["record"], patch=cfg["model"]["patch_size"],
                  session=s.wildcards.get("session"))


run(snakemake, main)
