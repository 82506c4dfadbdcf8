"""vmferry.stream"""
