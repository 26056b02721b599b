"""Stage 1, data. Takes RecBole atomic files (.inter, .item, .user) or a named MovieLens set.
Produces a filtered Dataset with item/user metadata and the train/valid/test Split of a protocol.
"""
