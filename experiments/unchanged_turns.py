"""unchanged_turns.py: which turns of a dataset changed nothing, the turns afsft.py's actor skips?

    python experiments/unchanged_turns.py data.pt [more.pt ...]

A turn changed nothing when the next turn of its episode shows the same image and prompt (the buffer's
`unchanged`, from `afsft.changed_nothing`). Invalid text always does; a valid move does where it runs
into a wall or past the end of the number line. For each file it prints the turns that have a next turn,
how many changed nothing, how many of those were valid, and the valid ones' most frequent texts. Where a
dataset holds none that were valid, `--skip-unchanged` leaves its offline runs exactly as they were.
"""
import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import afsft  # noqa: E402
import envs  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="+")
    for path in parser.parse_args().datasets:
        episodes = envs.load_dataset(path)["episodes"]
        turns, unchanged, valid_texts = 0, 0, collections.Counter()
        for ep in episodes:
            for t in range(len(ep["actions"]) - 1):
                turns += 1
                if afsft.changed_nothing(ep, t):
                    unchanged += 1
                    if ep["valid"][t]:
                        valid_texts[ep["actions"][t]] += 1
        print(f"{path}: {turns} turns with a next turn, {unchanged} changed nothing, "
              f"{sum(valid_texts.values())} of them valid {valid_texts.most_common(3)}")


if __name__ == "__main__":
    main()
