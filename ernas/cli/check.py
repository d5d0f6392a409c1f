"""``ernas-check FILE...``: validate search-space / architecture files and summarise them."""
from __future__ import annotations

import argparse
import math

from ernas.cli.common import user_errors
from ernas.api import find_space
from ernas.space import arch_of
from ernas.space_checks import warn_unset_decisions


@user_errors
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="ernas-check", description=__doc__)
    ap.add_argument("files", nargs="+", help="search space or architecture YAML files, or "
                    "shipped names (nafnet_ern, nafnet_sidd_w32, ...)")
    args = ap.parse_args(argv)
    from ernas import build_model
    from ernas.complexity import count_params

    for f in args.files:
        space = find_space(f)
        if space.is_arch:
            warn_unset_decisions(space)
        kind = "architecture" if space.is_arch else "search space"
        size = space.size()
        arch = arch_of(space) if space.is_arch else space.reference()
        alternatives = (f"{len(space.geometries)} geometry alternatives "
                        f"({', '.join(space.geometries)}), " if space.geometries else "")
        print(f"{f}: {kind} of family {space.family}, {alternatives}{len(space.positions)} block "
              f"positions, "
              f"{len(space.searchable)} searchable, {size} distinct architectures "
              f"(10^{math.log10(size):.1f}); {'parameters' if space.is_arch else 'reference parameters'} "
              f"{count_params(build_model(arch)):,}")


if __name__ == "__main__":
    main()
