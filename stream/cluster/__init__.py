"""Scale-out on Ray: one front (`stream serve --cluster`) over worker actors, one per GPU.

The front (front.py, relay.py) serves the page, places each new session on the worker with a free place
(placement.py) and adds up the workers' stats; each worker (actor.py) owns one model and terminates its
sessions' WebRTC itself, so the media goes straight to it. pool.py keeps the front's view of the
workers and handles their failures. Needs the `cluster` extra (Ray).
"""
