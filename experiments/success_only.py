"""success_only.py: keep only a dataset's episodes whose return is positive: the data an oracle episode filter
keeps (filtered BC, "%BC"), for SFT on it as a yardstick beside AFSFT (findings.md, session 48).

    python experiments/success_only.py data.pt success.pt
    python afsft.py --env BabyAI-GoToRedBall-v0 --filter none --offline success.pt --out runs/success-sft
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import envs  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="an afsft dataset (envs.py collect)")
    parser.add_argument("out", help="where to write the successful episodes, in the same format")
    args = parser.parse_args()
    data = envs.load_dataset(args.dataset)
    kept = [ep for ep in data["episodes"] if float(ep["rewards"].sum()) > 0]
    if not kept:
        sys.exit(f"success_only.py: error: no episode of {args.dataset} has a positive return")
    envs.save_dataset(args.out, data["env"], kept, data["options"])
    turns = sum(len(ep["actions"]) for ep in kept)
    print(f"{len(kept)} of {len(data['episodes'])} episodes kept ({turns} turns); wrote {args.out}")


if __name__ == "__main__":
    main()
