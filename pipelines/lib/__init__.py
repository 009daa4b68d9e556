"""What the stages share — libraries, not commands (the commands are the modules one level up).

parquet_store, sources, imaging, locations: datasets, image inputs, storage URIs (local or s3://…);
checkpoints, train_worker, search_space, devices, ray_env: training and its Ray set-up;
tracking, mlflow_model, pyfunc_entry, models: MLflow runs and the logged model; grabcut, mask_files,
errors: baselines, segmentation outputs, error messages.
"""
