"""What is learnt from runs: strategies compared at the same ε (``comparison``) and
the empirical privacy audit of a configuration (``audit``)."""
