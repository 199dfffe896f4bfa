"""Tandem on Ray Serve (`deploy.ray.app:build_app`); see deploy/ray/app.py."""
