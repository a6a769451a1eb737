"""What a run writes and shows: CSV/JSON reports and plots, the streamed LR trace, progress bars."""
