"""percept's deployment tooling: render the kustomize overlays, validate them offline and
check them against the project's deployment policies (`python deploy/validate.py`)."""
