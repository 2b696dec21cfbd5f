"""Revisions, oldest first; their ids are ordinal so the history reads in order."""
