"""The recipe: what a run is configured by (docs/DESIGN.md §4 for the layout it implies).

    schema.py      the dataclasses; each constraint in its field's metadata, one check pass
    parse.py       YAML + command line -> Recipe (one value converter, `typed`), for one stage and iteration
    trl_parser.py  trl's TrlParser over the dataclasses (argparse for command-line values)
    recipe.py      the Recipe view: its RunLayout, start and trained model, batch arithmetic, the SELMConfig
    freeze.py      recipe + overlays + overrides -> RUN_DIR/recipe.yaml, refusing a changed rerun
"""
