"""Print the table of served families (docs/families.md): for every architecture in
hookwire's family table, what the server makes of its tiny test checkpoint
(``tests/family_configs.py``) -- served or refused (and why), which fronts apply, which sites
it cannot serve.

    .venv/bin/python scripts/family_table.py > /tmp/table.md     # ~2-5 min on 2 cores

The fronts are the ones ``tests/test_families.py`` runs for the family (each equal to the
local library there); this script only reads what the server reports.
"""
from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
# The full matrix in bfloat16 (HOOKWIRE_TEST_DTYPE=bfloat16): TransformerLens's bridges of
# these mix float32 into half-precision matmuls, so their TL fronts are refused there.
BF16_TL_REFUSED = {"OlmoForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM",
                   "FlexOlmoForCausalLM"}


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from pyvene.models.intervenable_modelcard import type_to_module_mapping

    from family_configs import tiny_config
    from hookwire.errors import UnsupportedModel
    from hookwire.families import (build_hf_model, family_for_architecture,
                                   served_architectures)
    from hookwire.server.models import host
    from hookwire.server.prepare import prepare_model

    rows = []
    for arch in sorted(served_architectures()):
        family = family_for_architecture(arch)
        model, cfg = build_hf_model(arch, tiny_config(arch, family.config_class), seed=0)
        try:
            entry = prepare_model(host(arch, model, cfg, None, arch))
        except UnsupportedModel as exc:
            rows.append((arch, "refused at load: " + exc.message.split(": ", 1)[-1][:140],
                         "", ""))
            continue
        info = json.loads(entry.info_json)
        fronts = ["TL (stand-in, local bridge)" if info["tl_refused"] is None else
                  "TL refused: " + info["tl_refused"].split(" (", 1)[-1].rstrip(")")[:90],
                  "hookwire.hf"]
        fronts.append("generate" if info["generate_refused"] is None else
                      "generate refused (no KV cache)")
        if type(model) in type_to_module_mapping:
            fronts.append("pyvene")
        notes = []
        if any(s["eager"] for s in info["sites"]):
            notes.append("patterns via eager")
        if any("B*S" in s["shape"] for s in info["sites"]):
            notes.append("B*S sites")
        if info["unserved_sites"]:
            notes.append(f"{len(info['unserved_sites'])} sites refused by name")
        dtypes = "fp32, bf16" if arch not in BF16_TL_REFUSED else "fp32, bf16 (TL refused)"
        rows.append((arch, ", ".join(fronts), dtypes, "; ".join(notes)))
    print("| family (architecture) | fronts | dtypes tested | notes |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
