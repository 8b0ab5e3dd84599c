"""octn4's offline checks of its Nextflow workflow: lint, contract, rendered runs (see tests/test_nextflow.py)."""
