"""vmferry.monitor"""
