"""vmferry.transport"""
