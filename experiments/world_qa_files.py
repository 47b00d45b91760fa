"""Write the knowledge world's biographies and held-out questions as the JSONL files `build-bank --references` and
`evaluate --qa` read (issue 15 item 4): the shipped checkpoint's setting, asked through the user-facing commands.

    python experiments/world_qa_files.py --out runs/world_qa
    mini-m3 build-bank --model notebooks/assets/alltoken_demo --references runs/world_qa/facts.jsonl --out runs/world_qa/bank
    mini-m3 evaluate --model notebooks/assets/alltoken_demo --bank runs/world_qa/bank --qa runs/world_qa/questions.jsonl \\
        --out experiments/results/evaluate_qa_shipped.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mini_m3.data.world import World


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="folder for facts.jsonl (every biography) and questions.jsonl")
    p.add_argument("--settings", default="notebooks/assets/alltoken_demo/demo_settings.json",
                   help="the demo settings JSON whose world (n_people, seed) to write")
    p.add_argument("--n", type=int, default=300, help="held-out questions")
    a = p.parse_args(argv)
    s = json.loads(Path(a.settings).read_text())
    world = World.generate(s["n_people"], seed=s["seed"])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "facts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in world.references()))
    items = world.eval_questions("heldout", a.n, seed=s["seed"], phrasing="train")
    (out / "questions.jsonl").write_text("".join(
        json.dumps({"question": it.question, "answer": it.answer, "reference": it.person}) + "\n" for it in items))
    print(f"{len(world)} references and {len(items)} held-out questions in {out}")


if __name__ == "__main__":
    main()
