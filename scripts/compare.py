"""Put probe, kNN and fine-tune results of random-init and pretrained encoders side by side in one Markdown table.

    python scripts/compare.py runs/random runs/mae --output runs/comparison.md

Arguments are result files or folders searched recursively for the scripts' *_results.json files.
"""

import argparse

from mae_hf.cli import run_script
from mae_hf.results import collect_results, results_table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="Result files or folders holding *_results.json.")
    parser.add_argument("--output", help="Also write the table to this Markdown file.")
    args = parser.parse_args(argv)
    table = results_table(collect_results(args.paths))
    print(table)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    run_script(main)
