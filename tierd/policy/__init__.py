"""The decision engine: pure functions from tiers, page placement and access heat to migration plans.

``decide`` plans one tick's moves; ``MoveHistory`` remembers moves to hold back ping-pong; ``kernel`` decides how
tierd and the kernel's own tiering share placement; ``model`` holds the data both read and return.
"""
