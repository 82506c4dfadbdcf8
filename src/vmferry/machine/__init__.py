"""vmferry.machine"""
