"""vmferry.guests"""
