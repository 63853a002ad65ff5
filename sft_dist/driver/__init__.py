"""The driver's side of the Ray boundary: commands, the one launch path, Ray Train and Tune
connection, progress, sinks, plots, the run's records. Only launcher and tuning import Ray here."""
