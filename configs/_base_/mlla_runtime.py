# mlla-mm's runtime settings, inherited by every config of the project
# (listed last in `_base_`). Work in progress: filled in by issue 11.
custom_imports = dict(imports=['mlla_mm'], allow_failed_imports=False)
