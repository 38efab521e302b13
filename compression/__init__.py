"""Data-informed compression: Tucker-2, CPD and SVD in the Σ-weighted norm.

Pure math (torch float64, TensorLy for the Frobenius solutions): ``sigma_norm``,
``svd``, ``tucker2``, ``cpd``. Data: ``covariance`` (input statistics and their files).
Model: ``ranks`` (rank selection), ``surgery`` (eligible layers, loading factors into
the structures of ``dpfl.task.factorised``), ``cost`` (MACs), ``pipeline`` (compress a
model), ``finetune``. Names: ``names`` (methods, norms, scopes; no torch, so that
``--help`` and a run's settings check list them quickly).
"""
