"""lmforge.models"""
