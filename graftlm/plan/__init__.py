"""`graft plan`: choose the target share of the mixture and plan the token budget from a few short pilot runs and
a fitted scaling law of continued pre-training.

    config.py   the `plan:` recipe section
    checks.py   what the plan asks of the rest of the recipe (checked when the recipe loads); the pilots' arithmetic
    laws.py     the laws (D-CPT, CMR, Data Mixing Laws) and their robust fits with scipy
    choose.py   the choice: pure functions of the pilots' measured points -> a Plan (plan.json)
    pilots.py   the recipe side: the pilots' recipe overrides, their measured points, the planned recipe
    report.py   the outputs: plan.json, recipe.yaml, report.html
    run.py      the steps in order (`run_plan`), the training of a pilot handed in
    stage.py    the `plan` stage: the pilots as run directories on the recipe's prepared data
"""
