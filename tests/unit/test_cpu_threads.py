"""A worker actor's torch threads follow its CPU share: never the whole node, never zero."""

from splitserve.cluster.cpu_threads import threads_for


def test_threads_follow_the_cpu_share():
    assert threads_for(0.5) == 1          # a fraction still computes on one thread
    assert threads_for(1.0) == 1
    assert threads_for(1.5) == 1          # round down: two threads on 1.5 CPUs would oversubscribe
    assert threads_for(4.0) == 4
    assert threads_for(0.0) is None       # no CPU reserved (a GPU worker): torch's default stays
