#!/bin/sh
# preStop hook of the genimg worker container (`genimg-prestop` in the worker image).
#
# Kubernetes runs this before it sends SIGTERM. It tells this worker node, through
# Celery remote control, to stop consuming the shard queue: no new shard is taken
# from here on, whatever happens to signals (case C8: a shell wrapper as PID 1 would
# swallow SIGTERM). The running shard goes on. The SIGTERM that follows starts
# Celery's warm shutdown: wait for the running shard, give reserved-but-unstarted
# messages back to Redis when the channel closes, exit 0. The pod's
# terminationGracePeriodSeconds covers both (see deploy/README.md, Sizing).
#
# Node name: the Deployment starts the worker with --hostname genimg@$(POD_NAME).
# A failing hook only costs an event; Kubernetes still sends SIGTERM, so always exit 0.
node="genimg@${POD_NAME:-$(hostname)}"
queue="${GENIMG_QUEUE:-genimg}"
if timeout 20 celery -A workers.app:app control --timeout 5 --destination "$node" cancel_consumer "$queue"; then
    echo "genimg-prestop: $node stopped consuming $queue"
else
    echo "genimg-prestop: remote control did not answer; SIGTERM (warm shutdown) follows" >&2
fi
exit 0
