"""Everything that crosses ranks: the collectives (comm), how work is split (partition), where each weight lives
(layout).
"""
