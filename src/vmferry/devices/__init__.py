"""vmferry.devices"""
