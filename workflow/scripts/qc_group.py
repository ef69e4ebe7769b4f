from neuromoe.smk import run


def main(s):
    from neuromoe.results.qcreport import QC_KINDS, contact_sheet, subject_page

    figures = {}  # subject -> kind -> png (inputs are named <kind>__<subject>)
    for name, path in s.input.items():
        kind, subject = name.split("__")
        figures.setdefault(subject, {})[kind] = path
    for page in s.output.pages:
        subject = page.rsplit("sub-", 1)[1].removesuffix(".html")
        subject_page(subject, figures.get(subject, {}), page)
    for kind, title in QC_KINDS.items():
        items = [(f"sub-{sub}", f[kind]) for sub, f in sorted(figures.items()) if kind in f]
        contact_sheet(items, s.output[kind], title)


run(snakemake, main)
