"""An import-linter contract type of our own: "these packages import only the standard
library (and themselves)".  The agent runs in the initrd with a minimal Python: anything
else it imported would be missing there.  Used by ``[tool.importlinter]`` in
pyproject.toml (``lint-imports``, run by ``./run lint``)."""

from __future__ import annotations

import sys

from grimp import ImportGraph
from importlinter import Contract, ContractCheck, fields, output


class StdlibOnlyContract(Contract):
    type_name = "stdlib_only"
    packages = fields.ListField(subfield=fields.StringField())

    def check(self, graph: ImportGraph, verbose: bool) -> ContractCheck:
        bad: list[tuple[str, str, int, str]] = []
        for package in self.packages:  # type: ignore[attr-defined]
            for importer in sorted(graph.find_descendants(package) | {package}):
                for imported in sorted(graph.find_modules_directly_imported_by(importer)):
                    if imported == package or imported.startswith(package + "."):
                        continue
                    if imported.split(".")[0] in sys.stdlib_module_names:
                        continue
                    for d in graph.get_import_details(importer=importer, imported=imported):
                        bad.append((importer, imported, d["line_number"], d["line_contents"]))
        return ContractCheck(kept=not bad, metadata={"violations": bad})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for importer, imported, line, text in check.metadata["violations"]:
            output.print_error(f"{importer} -> {imported} (l.{line}: {text})", bold=False)
            output.new_line()
