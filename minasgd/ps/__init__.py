"""The parameter server: asynchronous SGD across worker processes (Paine et al., 2013).

(Being built: see cli.py for the command-line hooks.)
"""
