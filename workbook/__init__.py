"""Helpers the notebooks share, so that their cells show the course's commands and not the plumbing around them:

- shell: run a command as a learner would type it, show it and what it printed; stop what a notebook started.
"""
