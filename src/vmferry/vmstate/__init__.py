"""vmferry.vmstate"""
